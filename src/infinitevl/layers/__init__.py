"""nn.Modules built from ops, one concept per file."""
