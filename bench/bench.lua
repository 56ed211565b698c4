-- wrk script of the Headoni benchmark (bench/wrk.py runs it; see README "Benchmark").
-- Arguments after `--`: mode run first_desk desks tickets_per_desk batch_items
--   mode: create (POST /api/v1/tickets), batch (POST /api/v1/tickets/batch), read (GET a ticket by
--   number), plain (the URL as given, e.g. /healthz). `desks` 1 means the one hot desk first_desk.
-- The token secret of desk i is $BENCH_SECRET_PREFIX .. i (from the environment, never the command line).
-- Every body is unique: the requester's email and the subject carry run, thread and request counter.

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local mode, run, first, desks, per_desk, items
local headers = {}
local counter = 0
local text = "I loop back to /sign-in after typing my email. Steps: open the app, type the address, "
  .. "press continue, and the page reloads to the start. Seen on Firefox and Chrome since this morning."

function init(args)
  mode = args[1]
  run = args[2]
  first = tonumber(args[3])
  desks = tonumber(args[4])
  per_desk = tonumber(args[5])
  items = tonumber(args[6])
  math.randomseed(tid * 7919 + os.time())
  local prefix = os.getenv("BENCH_SECRET_PREFIX") or ""
  for i = 0, desks - 1 do
    local desk = first + i
    headers[i] = {
      ["Host"] = "d" .. desk .. ".localhost",
      ["Authorization"] = "Bearer " .. prefix .. desk,
      ["Content-Type"] = "application/json",
    }
  end
end

local function item()
  counter = counter + 1
  local key = run .. "t" .. tid .. "n" .. counter
  return '{"email":"' .. key .. '@bench.example","name":"Bench Requester","subject":"Bench ticket ' .. key
    .. '","body":"' .. text .. '","priority":"normal"}'
end

local function desk_headers()
  return headers[math.random(0, desks - 1)]
end

function request()
  if mode == "create" then
    return wrk.format("POST", "/api/v1/tickets", desk_headers(), item())
  elseif mode == "batch" then
    local parts = {}
    for i = 1, items do
      parts[i] = item()
    end
    return wrk.format("POST", "/api/v1/tickets/batch", desk_headers(), '{"tickets":[' .. table.concat(parts, ",") .. "]}")
  elseif mode == "read" then
    return wrk.format("GET", "/api/v1/tickets/" .. math.random(1, per_desk), desk_headers(), nil)
  end
  return wrk.format(nil, nil, nil, nil)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,'
      .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
