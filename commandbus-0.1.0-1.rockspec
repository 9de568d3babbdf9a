-- Release 0.1.0: the source is the tag v0.1.0. Written by `scripts/rocks cut 0.1.0` from
-- commandbus-scm-1.rockspec; README.md, "Cutting a release", says how.
rockspec_format = "3.0"
package = "commandbus"
version = "0.1.0-1"
source = {
  url = "git+https://github.com/commandbus/commandbus.git",
  tag = "v0.1.0",
}
description = {
  summary = "A durable command bus on PostgreSQL for Lua 5.4 and LuaJIT",
  detailed = [[
    Commands, workers with Lua handlers, retries, a troubleshooting queue,
    process managers (sagas) and awaiters over PostgreSQL, with pgmq
    queues and the database contract of the Python library rcmd. A C core
    (libpq + libuv) does the I/O on its own thread. Lua 5.4, or LuaJIT 2.1
    (OpenResty's included); PUC Lua 5.1 to 5.3 are refused at build time.
  ]],
  homepage = "https://github.com/commandbus/commandbus",
  license = "MIT",
  labels = { "postgresql", "pgmq", "queue", "saga", "openresty" },
}
dependencies = {
  -- LuaRocks calls LuaJIT "5.1": CMakeLists.txt tells it from PUC Lua 5.1
  -- by its headers and refuses PUC Lua 5.1 to 5.3 with what to do instead.
  "lua >= 5.1, < 5.5",
  "lua-cjson",
}
external_dependencies = {
  -- LuaRocks looks for headers only in <prefix>/include, and Debian keeps
  -- libpq-fe.h in include/postgresql: it checks libpq's library here, and
  -- CMake finds the header through pkg-config or pg_config.
  LIBPQ = { library = "pq" },
  LIBUV = { header = "uv.h", library = "uv" },
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_PREFIX_PATH = "$(LIBPQ_DIR);$(LIBUV_DIR)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    ROCK_LIBDIR = "$(LIBDIR)",
    ROCK_LUADIR = "$(LUADIR)",
    ROCK_BINDIR = "$(BINDIR)",
  },
  copy_directories = { "docs" },
}
test = {
  -- The busted specs, under the interpreter LuaRocks is set up for, against
  -- the commandbus on the Lua path (the rock `luarocks make` installed).
  type = "command",
  script = "spec/run.lua",
}
