"""memcli serve: HTTP (native and OpenAI), the resident models and the device queue, the client."""
