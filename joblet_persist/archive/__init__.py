"""Remote copies of the stored data, fed from the local segments (docs/operations.md, "S3 archive")."""
