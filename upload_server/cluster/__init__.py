"""Running several upload_server nodes as one service (cluster mode)."""
