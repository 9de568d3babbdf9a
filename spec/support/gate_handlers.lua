-- Handlers for specs that act while a handler runs: Gate holds its lane
-- until the file cmd.data.file exists (30 s at most), so that a spec can
-- signal a worker while a handler surely runs, then let it finish.
local socket = require "socket"

return {
  Gate = function(cmd)
    local deadline = socket.gettime() + 30
    while socket.gettime() < deadline do
      local f = io.open(cmd.data.file)
      if f then
        f:close()
        return {opened = true}
      end
      socket.sleep(0.02)
    end
    error("the gate was never opened")
  end,
  Echo = function(cmd) return {echo = cmd.data} end,
}
