-- For the specs of bus:await and its kin: when an await reads the database,
-- and a change made by another tool (psql, on its own connection) at a known
-- moment. With both, a spec can tell a wake by the notification from a wake
-- by a poll without assuming when a background process gets to run: it
-- compares the wake with the moment the change was actually made, and when
-- the two explanations cannot be told apart in a run, it runs again.
--
-- Times are wall-clock seconds: socket.gettime() here, clock_timestamp() in
-- the database. The test database runs on this machine (scripts/pg's does),
-- so both read the same clock.
local helper = require "spec.helper"

local M = {}

-- The planned times of an await's reads, in seconds from its start, as
-- core/src/awaiter.c schedules them: one read at once, then, after each
-- read that finds nothing, a wait of cb_await_safety_backoff_ms(attempt)
-- while listening (25 ms doubling, capped at CB_AWAIT_SAFETY_CAP_MS, 30 s)
-- or of cb_await_backoff_ms(attempt) with listen = false (25 ms doubling,
-- capped at 1 s). A read never comes before its planned time (each wait
-- starts once the previous read has returned, and cb_hub_wait does not
-- return early); it comes later by the round trips and by scheduling
-- delays, which add up from read to read.
local function planned(cap_ms)
  local reads, at = {0}, 0
  for attempt = 0, 1000 do
    at = at + math.min(25 * 2 ^ attempt, cap_ms) / 1000
    reads[#reads + 1] = at
    if at > 120 then break end
  end
  return reads
end
M.SAFETY = planned(30000)  -- 0, 0.025, 0.075, ..., 0.775, 1.575, 3.175, 6.375, ...
M.POLLING = planned(1000)  -- 0, 0.025, 0.075, ..., 0.775, 1.575, 2.575, 3.575, ...

-- How late a read may come after its planned time, at most, for a run to
-- count: a read planned less than this before a change might have come after
-- it and seen it, so such a run proves nothing. Generous: the read planned at
-- 1.575 s comes after seven round trips, a few milliseconds each when the
-- machine is idle.
M.LATE = 0.4
-- How far after a change the first read that can see it must be planned
-- for a wake by that read to be told from a wake by the notification (which
-- comes a few milliseconds after the commit).
M.APART = 0.2
-- How long after its planned time a read that saw the change may take to
-- end the await (its lateness, its round trip, the return to Lua).
M.SLACK = 0.5
-- When the change is aimed for, in seconds from the await's start: 0.625 s
-- after the read planned at 1.575 s (both schedules), 0.375 s before the one
-- planned at 2.575 s without LISTEN, 0.975 s before the safety read at
-- 3.175 s. The change may well come at another time (a loaded machine runs
-- psql late); the specs judge each run by when it came.
M.AT = 2.2

--- The first of `reads` planned within [from, to], or nil.
function M.read_between(reads, from, to)
  for _, at in ipairs(reads) do
    if at >= from and at <= to then return at end
  end
end

--- The last of `reads` planned before `at`, and the first planned at or after it.
function M.reads_around(reads, at)
  local before = 0
  for _, planned_at in ipairs(reads) do
    if planned_at >= at then return before, planned_at end
    before = planned_at
  end
end

--- A read, of either schedule, that could have seen a change made `changed`
--- s after the await's start and ended it at `woke` s: planned at most LATE
--- before the change (it might have come late, after it) and no later than
--- the wake. Both schedules count: the safety poll that runs while listening,
--- and the quicker one without LISTEN, in case the await stopped listening.
--- Nil when no read explains the wake.
function M.poll_explaining(changed, woke)
  return M.read_between(M.SAFETY, changed - M.LATE, woke) or M.read_between(M.POLLING, changed - M.LATE, woke)
end

--- Starts psql in the background to run `statement` at wall-clock time `at`.
--- The statement returns a row for each change it makes. psql connects at
--- once and waits in the database (pg_sleep_until), so that its start-up,
--- however slow, does not delay the change further. Returns a function that
--- waits for psql to end and returns the wall-clock time at which the change
--- was made: read in its transaction after the change, just before the
--- commit, so that no one can have seen the change earlier.
function M.change_at(at, statement)
  local out = os.tmpname()
  local marked = ("WITH changed AS MATERIALIZED (%s)"
                  .. " SELECT 'changed at ' || extract(epoch FROM clock_timestamp()) FROM changed"):format(statement)
  os.execute(("(psql -X -qAt -v ON_ERROR_STOP=1 %q -c %q -c %q; echo \"psql exited $?\") >%s 2>&1 &")
    :format(os.getenv("DATABASE_URL"), ("SELECT pg_sleep_until(to_timestamp(%.6f))"):format(at), marked, out))
  return function()
    local text
    helper.wait_until(function()
      local f = io.open(out)
      text = f and f:read("*a") or ""
      if f then f:close() end
      return text:find("psql exited %d+") ~= nil
    end, 60)
    os.remove(out)
    return assert(tonumber(text:match("changed at ([%d.]+)")), "psql made no change: " .. text)
  end
end

--- Runs `attempt` until a run tells the explanations apart, at most `times`
--- times. `attempt()` asserts what a clear run must show and returns true,
--- or returns false and what made the run ambiguous. Fails if no run was clear.
function M.until_clear(times, attempt)
  local ambiguous = {}
  for _ = 1, times do
    local clear, why = attempt()
    if clear then return end
    ambiguous[#ambiguous + 1] = why
  end
  error(("no clear run in %d: %s"):format(times, table.concat(ambiguous, "; ")), 2)
end

return M
