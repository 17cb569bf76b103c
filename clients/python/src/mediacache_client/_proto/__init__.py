"""Generated from proto/mediacache/v1/mediacache.proto by generate.py."""
