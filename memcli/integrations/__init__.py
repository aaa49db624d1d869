"""memcli where people already work: the MCP server for agents (`mcp`), pools as `llm` models
(`llm_plugin`). Each goes through the one backend (`memcli.server.launch.open_backend`): the
running server when there is one, else the library in this process."""
