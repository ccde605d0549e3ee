"""The aioquic adaptation: subclasses that let a crypto backend and the fast path share a connection."""
