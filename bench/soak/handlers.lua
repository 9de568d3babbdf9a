-- The soak's handler: a little work, as a real handler does some.
local socket = require "socket"
return {
  Work = function(cmd)
    socket.sleep(0.001)
    return {n = cmd.data.n}
  end,
}
