--- commandbus command-line tool: look at and operate a bus from a shell.
--
--   commandbus tsq list <domain> [--type T] [--limit N]
--   commandbus tsq retry|cancel|complete <domain> <command_id> [--reason R] [--result JSON] [--operator NAME]
--   commandbus command show|audit <domain> <command_id>
--   commandbus commands <domain> [--status S] [--type T] [--limit N]
--   commandbus batch show <domain> <batch_id>
--   commandbus queue metrics <queue>
--   commandbus setup
--
-- Connects to --dsn, else DATABASE_URL, else libpq's PG* variables. Exit
-- status: 0 done, 1 the operation failed (the error is printed), 2 usage.
local commandbus = require "commandbus"
local cjson = require "cjson"

local cli = {}

local USAGE = [[
usage: commandbus [--dsn DSN] <command> ...
  tsq list <domain> [--type T] [--limit N]          commands waiting for an operator
  tsq retry <domain> <id> [--operator NAME]         send it again (attempts reset)
  tsq cancel <domain> <id> [--reason R]             cancel it (replies CANCELED)
  tsq complete <domain> <id> [--result JSON]        complete it by hand (replies SUCCESS)
  command show <domain> <id>                        one command
  command audit <domain> <id>                       its audit trail
  commands <domain> [--status S] [--type T] [--limit N]
  batch show <domain> <batch_id>                    a batch with exact counts
  queue metrics <queue>                             pgmq metrics of a queue
  setup                                             apply schema migrations
]]

-- Splits arguments into positionals and --options.
local function parse(args)
  local positional, options = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local name = a:match("^%-%-(.+)$")
    if name then
      options[name] = args[i + 1]
      i = i + 2
    else
      positional[#positional + 1] = a
      i = i + 1
    end
  end
  return positional, options
end

local function show(value, out)
  out:write(cjson.encode(value), "\n")
end

local function fail(err, out)
  out:write("error: ", tostring(err), "\n")
  return 1
end

--- Runs the tool with an argument list; writes to out and err (file handles).
-- Returns the exit status.
function cli.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local pos, opt = parse(args)
  if #pos == 0 or opt.help then
    err:write(USAGE)
    return 2
  end
  local bus, cerr = commandbus.connect(opt.dsn)
  if not bus then return fail(cerr, err) end
  local status = 0
  local function done(res, e)
    if res == nil then status = fail(e, err) else show(res, out) end
  end
  local cmd, sub = pos[1], pos[2]
  local limit = tonumber(opt.limit)
  if cmd == "setup" then
    done(bus:setup())
  elseif cmd == "tsq" and sub == "list" and pos[3] then
    done(bus:tsq():list{domain = pos[3], type = opt.type, limit = limit})
  elseif cmd == "tsq" and sub == "retry" and pos[4] then
    local msg_id, e = bus:tsq():retry(pos[3], pos[4], {operator = opt.operator})
    done(msg_id and {command_id = pos[4], new_msg_id = msg_id}, e)
  elseif cmd == "tsq" and sub == "cancel" and pos[4] then
    local ok, e = bus:tsq():cancel(pos[3], pos[4], opt.reason or "", {operator = opt.operator})
    done(ok and {command_id = pos[4], status = "CANCELED"}, e)
  elseif cmd == "tsq" and sub == "complete" and pos[4] then
    local decoded, result = true, nil
    if opt.result then decoded, result = pcall(cjson.decode, opt.result) end
    if not decoded or (opt.result and type(result) ~= "table") then
      err:write("error: --result must be a JSON object, got ", tostring(opt.result), "\n")
      status = 2
    else
      local ok, e = bus:tsq():complete(pos[3], pos[4], result, {operator = opt.operator})
      done(ok and {command_id = pos[4], status = "COMPLETED"}, e)
    end
  elseif cmd == "command" and sub == "show" and pos[4] then
    done(bus:get_command(pos[3], pos[4]))
  elseif cmd == "command" and sub == "audit" and pos[4] then
    done(bus:audit(pos[3], pos[4]))
  elseif cmd == "commands" and sub then
    done(bus:list_commands{domain = sub, status = opt.status, type = opt.type, limit = limit})
  elseif cmd == "batch" and sub == "show" and pos[4] then
    done(bus:get_batch(pos[3], pos[4]))
  elseif cmd == "queue" and sub == "metrics" and pos[3] then
    local q, e = bus:queue(pos[3])
    if q then done(q:metrics()) else done(nil, e) end
  else
    err:write(USAGE)
    status = 2
  end
  bus:close()
  return status
end

return cli
