rockspec_format = "3.0"
package = "commandbus"
version = "scm-1"
source = {
  url = "git+file:///dev/null",
}
description = {
  summary = "A durable command bus on PostgreSQL for Lua",
  detailed = [[
    Commands, workers with Lua handlers, retries, a troubleshooting queue,
    process managers and awaiters over PostgreSQL, with pgmq-compatible
    queues. A C core (libpq + libuv) does the I/O on its own thread.
  ]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.1",
  "lua-cjson",
}
external_dependencies = {
  LIBPQ = { header = "libpq-fe.h" },
  LIBUV = { header = "uv.h" },
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    LUA_INCLUDE_DIR = "$(LUA_INCDIR)",
    LUA_LIBDIR = "$(LIBDIR)",
    LUA_LUADIR = "$(LUADIR)",
    LUA_BINDIR = "$(BINDIR)",
  },
}
