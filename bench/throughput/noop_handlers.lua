-- No-op handlers for bench/throughput: the cost measured is the bus's own.
return {
  Noop = function() return nil end,
}
