-- Handlers of bench/peers' latency run. Signal tells the benchmark, over UDP
-- on loopback (port BENCH_PEERS_SIGNAL_PORT), "<data.i> <time>": the
-- wall-clock time the handler started. Stop ends the worker.
local socket = require "socket"

local port = assert(tonumber(os.getenv("BENCH_PEERS_SIGNAL_PORT")), "BENCH_PEERS_SIGNAL_PORT is not set")
local udp = assert(socket.udp())

return {
  Signal = function(cmd)
    local started = socket.gettime()
    assert(udp:sendto(("%d %.6f"):format(cmd.data.i, started), "127.0.0.1", port))
  end,
  Stop = function(_, ctx) ctx:stop_worker() end,
}
