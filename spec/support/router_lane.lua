-- A message router handler for spec/message_router_spec.lua, loaded in each
-- lane's own Lua state. Lanes share nothing with the spec's state, so they
-- report through files: each value names a file prefix (`file`), and lane N
-- appends "key seq" per value to <file>.<N>, then "stop" from on_stop.
-- A value may ask the lane to sleep (`sleep`, seconds) or to raise (`raise`).
local socket = require "socket"

local prefix -- the file prefix of the last value seen, for on_stop

local function append(path, line)
  local f = assert(io.open(path, "a"))
  f:write(line, "\n")
  f:close()
end

local lane_handler = {}

function lane_handler.on_batch(batch, lane)
  for _, value in ipairs(batch) do
    prefix = value.file
    if value.sleep then socket.sleep(value.sleep) end
    if value.raise then error("asked to raise on " .. tostring(value.key)) end
    append(("%s.%d"):format(value.file, lane), ("%s %d"):format(value.key, value.seq))
  end
end

function lane_handler.on_stop(lane)
  if prefix then append(("%s.%d"):format(prefix, lane), "stop") end
end

return lane_handler
