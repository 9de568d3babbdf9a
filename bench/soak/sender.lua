-- The soak's sender: <domain> <rate per second> <seconds>. Sends in batches
-- every 100 ms, keeping to the rate by the clock; prints `sent <n>` at the end.
local commandbus = require "commandbus"
local socket = require "socket"
local domain, rate, seconds = arg[1], tonumber(arg[2]), tonumber(arg[3])
local bus = assert(commandbus.connect())
local start = socket.gettime()
local sent, failures = 0, 0
while socket.gettime() - start < seconds do
  local due = math.floor((socket.gettime() - start) * rate) - sent
  if due > 0 then
    local commands = {}
    for i = 1, due do commands[i] = {type = "Work", data = {n = sent + i}} end
    local res, err = bus:send_batch{domain = domain, commands = commands}
    if res then sent = sent + due
    else failures = failures + 1; io.stderr:write("bench/soak: send failed: ", tostring(err), "\n") end
  end
  socket.sleep(0.1)
end
bus:close()
io.write(("sent %d failures %d\n"):format(sent, failures))
