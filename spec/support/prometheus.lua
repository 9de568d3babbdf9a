-- A strict reader of the Prometheus text exposition format 0.0.4, written
-- for the specs (they check what the core writes against it): comments,
-- HELP and TYPE lines, samples with escaped label values, float values.
-- Raises on anything the format does not allow, or that a scraper would
-- refuse: a TYPE after the family's first sample, a family split in two, a
-- repeated series, HELP or TYPE twice.
local prometheus = {}

local NAME = "^[a-zA-Z_:][a-zA-Z0-9_:]*"
local LABEL = "^[a-zA-Z_][a-zA-Z0-9_]*"
local TYPES = {counter = true, gauge = true, histogram = true, summary = true, untyped = true}

local function fail(n, line, why)
  error(string.format("line %d: %s: %q", n, why, line), 0)
end

local function unescape_help(s)
  return (s:gsub("\\(.)", function(c)
    if c == "n" then return "\n" elseif c == "\\" then return "\\" end
    return "\\" .. c
  end))
end

local function number(s)
  if s == "+Inf" or s == "Inf" then return math.huge end
  if s == "-Inf" then return -math.huge end
  if s == "NaN" then return 0 / 0 end
  if not s:match("^[-+]?%d*%.?%d+[eE]?[-+]?%d*$") and not s:match("^[-+]?%d+%.?%d*[eE]?[-+]?%d*$") then return nil end
  return tonumber(s)
end

-- Reads `{a="x",b="y"}` from position i of line; returns labels, next i.
local function read_labels(line, i, n)
  local labels = {}
  i = i + 1
  if line:sub(i, i) == "}" then return labels, i + 1 end
  while true do
    local name = line:match(LABEL, i)
    if not name then fail(n, line, "bad label name") end
    i = i + #name
    if line:sub(i, i + 1) ~= '="' then fail(n, line, "label without =\"") end
    i = i + 2
    local value = {}
    while true do
      local c = line:sub(i, i)
      if c == "" then fail(n, line, "unterminated label value") end
      if c == '"' then break end
      if c == "\\" then
        local e = line:sub(i + 1, i + 1)
        if e == "n" then value[#value + 1] = "\n"
        elseif e == "\\" or e == '"' then value[#value + 1] = e
        else fail(n, line, "bad escape in label value") end
        i = i + 2
      else
        value[#value + 1] = c
        i = i + 1
      end
    end
    if labels[name] then fail(n, line, "label repeated") end
    labels[name] = table.concat(value)
    i = i + 1
    local c = line:sub(i, i)
    if c == "}" then return labels, i + 1 end
    if c ~= "," then fail(n, line, "expected , or } after a label") end
    i = i + 1
  end
end

local function series_key(name, labels)
  local names = {}
  for k in pairs(labels) do names[#names + 1] = k end
  table.sort(names)
  local parts = {name}
  for _, k in ipairs(names) do parts[#parts + 1] = k .. "=" .. labels[k] end
  return table.concat(parts, "\0")
end

--- Parses an exposition: returns families by name, each {name=, type=,
-- help=, samples = {{labels=, value=}, ...}}, and their names in order.
function prometheus.parse(text)
  local families, order, seen_series = {}, {}, {}
  local current
  local function family(name, n, line)
    local f = families[name]
    if f == nil then
      f = {name = name, samples = {}}
      families[name] = f
      order[#order + 1] = name
    elseif current ~= f then
      fail(n, line, "family " .. name .. " is split")
    end
    current = f
    return f
  end
  if text ~= "" and text:sub(-1) ~= "\n" then error("the exposition does not end with a newline", 0) end
  local n = 0
  for line in text:gmatch("([^\n]*)\n") do
    n = n + 1
    local kind, name, rest = line:match("^#%s+(%u+)%s+(%S+)%s*(.*)$")
    if kind == "HELP" or kind == "TYPE" then
      if not name:match(NAME .. "$") then fail(n, line, "bad metric name") end
      local f = family(name, n, line)
      if kind == "HELP" then
        if f.help then fail(n, line, "HELP twice") end
        f.help = unescape_help(rest)
      else
        if f.type then fail(n, line, "TYPE twice") end
        if #f.samples > 0 then fail(n, line, "TYPE after a sample") end
        if not TYPES[rest] then fail(n, line, "unknown type") end
        f.type = rest
      end
    elseif line:match("^#") or line:match("^%s*$") then
      -- a comment or an empty line
    else
      name = line:match(NAME)
      if not name then fail(n, line, "bad metric name") end
      local i = #name + 1
      local labels = {}
      if line:sub(i, i) == "{" then labels, i = read_labels(line, i, n) end
      local value, timestamp = line:sub(i):match("^ +(%S+)(.*)$")
      if not value then fail(n, line, "no value") end
      if timestamp ~= "" and not timestamp:match("^ +%-?%d+$") then fail(n, line, "bad timestamp") end
      local v = number(value)
      if v == nil then fail(n, line, "bad value") end
      local f = family(name, n, line)
      local key = series_key(name, labels)
      if seen_series[key] then fail(n, line, "series repeated") end
      seen_series[key] = true
      f.samples[#f.samples + 1] = {labels = labels, value = v}
    end
  end
  return families, order
end

--- The value of the one sample of family `name` whose labels include all of
-- `match`; nil when there is none, an error when there are several.
function prometheus.value(families, name, match)
  local f = families[name]
  if not f then return nil end
  local found
  for _, s in ipairs(f.samples) do
    local ok = true
    for k, v in pairs(match or {}) do ok = ok and s.labels[k] == v end
    if ok then
      if found then error("several samples of " .. name .. " match", 2) end
      found = s.value
    end
  end
  return found
end

return prometheus
