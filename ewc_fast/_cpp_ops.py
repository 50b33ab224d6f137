"""C++ backend of the consolidation ops: thin wrappers turning tensor lists into pointer lists."""
