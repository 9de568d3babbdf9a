-- The commandbus command-line tool in another OS process (bin/commandbus
-- under the interpreter of the spec run), for what needs one: a worker or
-- reply router in the foreground, stopped by a signal.
local socket = require "socket"

local cli_process = {}

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function read_file(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

--- Starts `commandbus <args...>`; returns {pid=, signal(name), wait(seconds)
-- -> exit status, output (stdout and stderr)}. wait raises after `seconds`
-- (default 30) without an exit.
function cli_process.spawn(args)
  local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
  local base = os.tmpname()
  local out, pidfile, rcfile = base .. ".out", base .. ".pid", base .. ".rc"
  local quoted = {}
  for i, a in ipairs(args) do quoted[i] = quote(a) end
  -- The wrapper's own output goes nowhere: a spec run piped to a pager must
  -- not wait for this process to end.
  os.execute(("(%s bin/commandbus %s >%s 2>&1 & echo $! >%s; wait $!; echo $? >%s) </dev/null >/dev/null 2>&1 &"):format(
    lua, table.concat(quoted, " "), out, pidfile, rcfile))
  local pid
  for _ = 1, 500 do
    pid = tonumber(read_file(pidfile) or "")
    if pid then break end
    socket.sleep(0.01)
  end
  assert(pid, "the command did not start")
  local p = {pid = pid}
  function p.signal(name)
    os.execute(("kill -%s %d 2>/dev/null"):format(name, pid))
  end
  function p.output()
    return read_file(out) or ""
  end
  function p.wait(seconds)
    local deadline = socket.gettime() + (seconds or 30)
    while socket.gettime() < deadline do
      local rc = tonumber(read_file(rcfile) or "")
      if rc then
        local output = p.output()
        for _, f in ipairs{base, out, pidfile, rcfile} do os.remove(f) end
        return rc, output
      end
      socket.sleep(0.02)
    end
    p.signal("KILL")
    error("the command did not exit within " .. (seconds or 30) .. " s; its output:\n" .. p.output(), 2)
  end
  return p
end

return cli_process
