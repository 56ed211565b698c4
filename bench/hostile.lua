-- wrk script of `python -m bench.hostile`: the desk that is not attacked creates tickets, one after
-- another on each connection. Arguments after `--`: run desk. The token secret of desk i is
-- $BENCH_SECRET_PREFIX .. i (from the environment). Every body is unique.

local run, headers
local counter = 0

function init(args)
  run = args[1]
  local desk = args[2]
  headers = {
    ["Host"] = "d" .. desk .. ".localhost",
    ["Authorization"] = "Bearer " .. (os.getenv("BENCH_SECRET_PREFIX") or "") .. desk,
    ["Content-Type"] = "application/json",
  }
end

function request()
  counter = counter + 1
  local key = run .. "n" .. counter .. "r" .. math.random(1, 1000000000)
  return wrk.format("POST", "/api/v1/tickets", headers, '{"email":"' .. key .. '@desk.example","subject":"Ticket '
    .. key .. '","body":"Created while another client attacks the server.","priority":"normal"}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,'
      .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
