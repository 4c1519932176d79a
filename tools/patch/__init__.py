"""Keep FlagScale's changes to vendored backends as patch files.

``unpatch.py`` turns ``third_party/<Backend>`` into "recorded base commit + our patches";
``patch.py`` turns the edits made there back into ``flagscale/backends/<Backend>/*.patch``.
"""
