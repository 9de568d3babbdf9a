-- docs/api.md covers the whole public API: every function of every module
-- under lua/commandbus/, every method of every object type, each with an
-- example; and every option the bindings read by name. The API is found by
-- walking the module tables and the metatables at run time, so a function
-- added anywhere without a reference entry fails here, naming it.
local commandbus = require "commandbus"
local helper = require "spec.helper"

local REFERENCE = "docs/api.md"

local function read(path)
  local f = assert(io.open(path, "r"))
  local text = f:read("*a")
  f:close()
  return text
end

-- The reference's entries: each "### `name...`" heading, and whether its
-- section (up to the next heading) has a ```lua example.
local function reference_entries()
  local entries, order = {}, {}
  local text = read(REFERENCE)
  local current
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    local name = line:match("^### `([%w_.:]+)")
    if name then
      current = {name = name, example = false}
      entries[name] = current
      order[#order + 1] = current
    elseif line:match("^##") then
      current = nil
    elseif current and line:match("^```lua") then
      current.example = true
    end
  end
  return entries, order
end

-- The Lua modules a user can require: every file of lua/commandbus/.
local function module_names()
  local names = {}
  local ls = assert(io.popen("ls lua/commandbus"))
  for file in ls:lines() do
    local base = file:match("^([%w_]+)%.lua$")
    if base then names[#names + 1] = base == "init" and "commandbus" or "commandbus." .. base end
  end
  ls:close()
  table.sort(names)
  return names
end

-- name -> where it was found, for every public function: module functions
-- as "module.name", methods as "type:name".
local function public_api(bus)
  local api = {}
  local function add_functions(prefix, separator, t, where)
    for key, value in pairs(t) do
      if type(key) == "string" and type(value) == "function" and key:sub(1, 1) ~= "_" then
        api[prefix .. separator .. key] = where
      end
    end
  end
  for _, name in ipairs(module_names()) do
    local ok, module = pcall(require, name)
    assert(ok, ("%s cannot be required outside a host (%s): make it loadable (keep host-only parts inside"
                .. " functions) so that %s can walk it"):format(name, tostring(module), "spec/api_reference_spec.lua"))
    if type(module) == "table" then add_functions(name, ".", module, "module " .. name) end
  end
  -- Object types made in C: their metatables are in the registry under
  -- "commandbus.<type>"; the methods are in __index.
  for key, mt in pairs(debug.getregistry()) do
    if type(key) == "string" and key:match("^commandbus%.[%w_]+$") and type(mt) == "table"
       and type(mt.__index) == "table" then
      add_functions(key:match("^commandbus%.([%w_]+)$"), ":", mt.__index, "metatable " .. key)
    end
  end
  -- Object types made in Lua: one of each, made here. A new one goes here.
  local lua_objects = {
    tsq = bus:tsq(),
    manager = commandbus.process.define{
      type = "ReferenceCheck", domain = "reference_check",
      first_step = function() return "one" end,
      build_command = function() return {type = "One"} end,
      update_state = function(state) return state end,
      next_step = function() end,
    },
  }
  for prefix, object in pairs(lua_objects) do
    local mt = getmetatable(object)
    add_functions(prefix, ":", type(mt.__index) == "table" and mt.__index or mt, "objects like " .. prefix)
  end
  return api
end

-- Names of the options the bindings read through their option readers.
local function binding_options()
  local options = {}
  local ls = assert(io.popen("ls bindings/lua/*.c"))
  for path in ls:lines() do
    local text = read(path)
    for reader, name in text:gmatch("([%w_]+)%(L, [^\"\n]-\"([%w_]+)\"") do
      if reader:match("^cbL_optfield_") or reader == "int_option" or reader == "string_option"
         or reader == "number_field" then
        options[name] = path
      end
    end
  end
  ls:close()
  return options
end

-- Fails listing the problems, one a line, under what they mean.
local function expect_none(problems, meaning)
  table.sort(problems)
  assert(#problems == 0, ("%s %s:\n  %s"):format(REFERENCE, meaning, table.concat(problems, "\n  ")))
end

describe("the API reference (docs/api.md)", function()
  local bus
  setup(function() bus = helper.bus() end)
  teardown(function() bus:close() end)

  it("has an entry for every public function and method", function()
    local entries = reference_entries()
    local missing = {}
    for name, where in pairs(public_api(bus)) do
      if not entries[name] then missing[#missing + 1] = ("%-40s (%s)"):format(name, where) end
    end
    expect_none(missing, "has no entry for these (add a \"### `name(...)`\" heading with a description and a"
                         .. " ```lua example)")
  end)

  it("documents nothing that does not exist", function()
    local api = public_api(bus)
    local prefixes = {}
    for name in pairs(api) do prefixes[name:match("^(.*)[.:]")] = true end
    local stale = {}
    for name in pairs(reference_entries()) do
      local prefix, field = name:match("^(.*)[.:]([%w_]+)$")
      -- fields that are not functions (commandbus._VERSION) are looked up where they live
      local module_ok, module = pcall(require, prefix)
      local exists = api[name] or (module_ok and type(module) == "table" and module[field] ~= nil)
      if prefixes[prefix] and not exists then stale[#stale + 1] = name end
    end
    expect_none(stale, "documents what the API no longer has")
  end)

  it("gives every entry an example", function()
    local _, order = reference_entries()
    local bare = {}
    for _, entry in ipairs(order) do
      if not entry.example then bare[#bare + 1] = entry.name end
    end
    expect_none(bare, "has entries without a ```lua example")
  end)

  it("names every option the bindings read", function()
    local text = read(REFERENCE)
    local missing = {}
    for name, path in pairs(binding_options()) do
      if not text:find("`" .. name .. "`", 1, true) then missing[#missing + 1] = ("%s (read in %s)"):format(name, path) end
    end
    expect_none(missing, "does not mention these options (as `name`, in the table of the function that takes them)")
  end)

  it("finds the API it checks (the walk itself works)", function()
    local api = public_api(bus)
    for _, name in ipairs({"commandbus.connect", "bus:send", "queue:read", "worker:run", "handler_context:stop_worker",
                           "reply_router:run", "message_router:route", "tsq:retry", "commandbus.process.define",
                           "manager:start", "commandbus.cli.main"}) do
      assert.is_truthy(api[name], name)
    end
  end)
end)
