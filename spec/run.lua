-- Runs the busted specs under the Lua that runs this file, against the
-- commandbus that this Lua's path finds. It is what `luarocks test` runs (the
-- rockspec's test script), with the interpreter LuaRocks is set up for:
--
--   luarocks make                      # builds and installs the rock
--   eval "$(luarocks path)"            # its tree on the paths (a user tree)
--   DATABASE_URL=postgresql://... luarocks test [-- spec/queue_spec.lua ...]
--
-- Arguments go to busted; without any, it runs every spec under spec/.
-- Some specs start other Lua processes: they run the interpreter named by
-- COMMANDBUS_LUA, so this script starts busted again with it set to its own
-- interpreter. (In a clone, scripts/spec runs the specs against the build tree.)

local function fail(message)
  io.stderr:write("spec/run.lua: ", message, "\n")
  os.exit(2)
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

if os.getenv("COMMANDBUS_LUA") then
  -- Started by the code below (or by scripts/spec): run busted here.
  require("busted.runner")({standalone = false})
  return
end

local lowest = 0
while arg[lowest - 1] do lowest = lowest - 1 end
local interpreter = arg[lowest]

if not os.getenv("DATABASE_URL") then
  fail("set DATABASE_URL to a PostgreSQL database the specs may use (they create and drop their own queues)")
end
if not package.searchpath("commandbus.core", package.cpath) then
  fail("commandbus is not on " .. interpreter .. "'s path: install it (luarocks make) and put its tree on the"
       .. " paths (eval \"$(luarocks path)\")")
end
if not package.searchpath("busted.runner", package.path) then
  fail("busted is not on " .. interpreter .. "'s path (Debian: apt install lua-busted; else luarocks install busted)")
end

local words = {"COMMANDBUS_LUA=" .. quote(interpreter), quote(interpreter), quote(arg[0]), "--output=plainTerminal"}
for i = 1, #arg do words[#words + 1] = quote(arg[i]) end
-- The *_nginx_spec.lua files start nginx over the build tree (scripts/spec
-- luajit --nginx runs them in a clone): not part of this run.
if #arg == 0 then
  words[#words + 1] = "--exclude-pattern=_nginx_spec"
  words[#words + 1] = "spec"
end

local ok, how, code = os.execute(table.concat(words, " "))
if type(ok) == "number" then -- LuaJIT without 5.2 compatibility: a wait status
  os.exit(ok == 0 and 0 or 1)
end
os.exit(ok and 0 or (how == "exit" and code or 1))
