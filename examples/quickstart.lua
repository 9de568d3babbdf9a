-- commandbus quickstart: a queue round trip on the database of DATABASE_URL
-- (make demo starts a private PostgreSQL and runs this).
local commandbus = require "commandbus"

local bus = assert(commandbus.connect())
assert(bus:setup())
print(("commandbus %s connected; schema version %d"):format(commandbus._VERSION, commandbus.schema_version()))

local q = assert(bus:queue("quickstart"))
assert(q:create())
q:purge()

local ids = assert(q:send_batch({
  {task = "resize", image = "cat.png"},
  {task = "resize", image = "dog.png"},
  {task = "notify", user = "ada"},
}))
print(("sent %d messages: ids %s"):format(#ids, table.concat(ids, ", ")))

local batch = assert(q:read{vt = 30, qty = 10})
for _, m in ipairs(batch) do
  print(("read  #%s (read %d time) %s"):format(m.msg_id, m.read_ct, m.message.task))
  assert(q:archive(m.msg_id))
end
local metrics = assert(q:metrics())
print(("queue %s: %d left, %d sent in all"):format(metrics.queue_name, metrics.queue_length, metrics.total_messages))
bus:close()
