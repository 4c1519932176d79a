"""Configuration: experiment schema, hostfile, env layering, argument flattening."""
