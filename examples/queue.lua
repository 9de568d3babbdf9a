-- pgmq queues directly: send, read with a visibility timeout, archive.
--   lua5.4 examples/queue.lua
local commandbus = require "commandbus"

local bus = assert(commandbus.connect())
local q = assert(bus:queue("example_jobs"))
assert(q:create())
q:purge()
assert(q:send_batch({{job = "resize"}, {job = "thumbnail"}}))
assert(q:send({job = "later"}, {delay = 60}))          -- invisible for a minute
for _, m in ipairs(assert(q:read{vt = 30, qty = 10})) do
  print(("#%s %s (read %d time)"):format(m.msg_id, m.message.job, m.read_ct))
  assert(q:archive(m.msg_id))
end
-- Waits up to 1 s for a send from anywhere (LISTEN/NOTIFY), else returns {}.
print("more right now:", #assert(q:read_with_poll{max_wait = 1, poll_interval = 0.25}))
local m = assert(q:metrics())
print(("%s: %d waiting, %d sent in all"):format(m.queue_name, m.queue_length, m.total_messages))
q:drop()
bus:close()
