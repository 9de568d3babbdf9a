local commandbus = require "commandbus"
local bus = assert(commandbus.connect(os.getenv("DATABASE_URL")))
assert(bus:setup())
assert(bus:queue("bench_floor__commands"):create())
bus:close()
