-- bench/nginx: the await phase's commands, completed by a worker in another
-- process once the awaits are pending.
return {
  Echo = function() return nil end,
}
