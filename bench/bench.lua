-- wrk script of the Headoni benchmark (bench/wrk.py runs it; see README "Benchmark").
-- Arguments after `--`: mode run first_desk desks tickets_per_desk batch_items
--   mode: create (POST /api/v1/tickets), batch (POST /api/v1/tickets/batch), read (GET a ticket by
--   number), plain (the URL as given, e.g. /healthz). `desks` 1 means the one hot desk first_desk.
-- The token secret of desk i is $BENCH_SECRET_PREFIX .. i (from the environment, never the command line).
-- Every body is unique: the requester's email and the subject carry run, thread and request counter.

local threads = 0
local thread_list = {}

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
  table.insert(thread_list, thread)
end

-- With BENCH_STATUSES set, count the answers by status (bench/fair.py). Only then: a response()
-- function makes wrk parse every answer's headers and body, which costs the load generator CPU.
if os.getenv("BENCH_STATUSES") then
  function response(status, headers, body)
    local key = "status_" .. status
    _G[key] = (_G[key] or 0) + 1
  end
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
  -- plain (the HTTP ceiling): the URL as given, sent as a desk's client sends it, with its token, so
  -- that it is served as known clients are (the server queues requests without a token it knows).
  return wrk.format(nil, nil, desk_headers(), nil)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,'
      .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
  if os.getenv("BENCH_STATUSES") then
    local parts = {}
    for _, code in ipairs({200, 201, 400, 408, 413, 429, 500, 503}) do
      local n = 0
      for _, thread in ipairs(thread_list) do
        n = n + (thread:get("status_" .. code) or 0)
      end
      parts[#parts + 1] = string.format('"%d":%d', code, n)
    end
    io.write("BENCH_STATUS {" .. table.concat(parts, ",") .. "}\n")
  end
end
