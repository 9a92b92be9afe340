"""The content-addressed artifact store, local or S3; imports nothing else of the project."""
