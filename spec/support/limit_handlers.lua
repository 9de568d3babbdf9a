-- Handlers for the limit specs, run by worker processes: each appends
-- "<start> <end>" (wall-clock seconds) of its run to the file named by
-- LIMIT_LOG, so that the spec can tell how many ran at once.
local socket = require "socket"

local function logged(seconds)
  return function()
    local started = socket.gettime()
    if seconds > 0 then socket.sleep(seconds) end
    local f = assert(io.open(assert(os.getenv("LIMIT_LOG")), "a"))
    f:write(("%.6f %.6f\n"):format(started, socket.gettime()))
    f:close()
  end
end

return {Limited = logged(0), Slow = logged(0.15)}
