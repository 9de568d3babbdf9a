-- A message router handler module that is a plain function(batch, lane):
-- lane N appends one line per batch, "<lane> <batch size>", to <file>.<N>.
return function(batch, lane)
  local f = assert(io.open(("%s.%d"):format(batch[1].file, lane), "a"))
  f:write(("%d %d\n"):format(lane, #batch))
  f:close()
end
