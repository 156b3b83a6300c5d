-- Runs the Argo CD health scripts of config/argocd/ the way Argo CD does (a global `obj`, the
-- script's return value is the health) against sample objects, one case per branch.
-- Usage: lua5.4 tests/chart/argocd_health_test.lua config/argocd
local dir = arg[1] or "config/argocd"

local function cond(type, status, reason, message)
  return { type = type, status = status, reason = reason, message = message,
           lastTransitionTime = "2026-01-01T00:00:00Z" }
end

local function object(opts)
  local o = { apiVersion = "backflow.dev/v1alpha1", metadata = { name = "s", namespace = "ns", generation = opts.generation or 2 },
              spec = opts.spec or {} }
  if opts.conditions ~= nil then
    o.status = { observedGeneration = opts.observed or 2, conditions = opts.conditions }
  elseif opts.status ~= nil then
    o.status = opts.status
  end
  return o
end

local ready = cond("Ready", "True", "Succeeded", "Last run sent 12 rows")
local not_reconciling = cond("Reconciling", "False", "Idle", "")
local reversesync_cases = {
  { "suspended wins over everything", object { spec = { suspend = true }, conditions = { cond("Stalled", "True", "InvalidSpec", "x") } },
    "Suspended", "ReverseSync is suspended (spec.suspend)" },
  { "suspend false is not suspended", object { spec = { suspend = false }, conditions = { ready, not_reconciling } },
    "Healthy", "Succeeded: Last run sent 12 rows" },
  { "no status yet", object {}, "Progressing", "Waiting for the operator to report status" },
  { "status without conditions", object { status = { observedGeneration = 2 } },
    "Progressing", "Waiting for the operator to report status" },
  { "spec changed, not yet observed", object { generation = 3, observed = 2, conditions = { ready } },
    "Progressing", "Waiting for the operator to observe generation 3" },
  { "no observedGeneration yet", object { status = { conditions = { ready } } },
    "Progressing", "Waiting for the operator to observe generation 2" },
  { "stalled", object { conditions = { cond("Ready", "False", "InvalidSpec", "spec.mappings[1].to: duplicate"), cond("Stalled", "True", "InvalidSpec", "spec.mappings[1].to: duplicate") } },
    "Degraded", "InvalidSpec: spec.mappings[1].to: duplicate" },
  { "stalled False is ignored", object { conditions = { cond("Stalled", "False", "Ok", ""), ready } },
    "Healthy", "Succeeded: Last run sent 12 rows" },
  { "rows rejected", object { conditions = { ready, cond("Degraded", "True", "RowsRejected", "3 rows rejected") } },
    "Degraded", "RowsRejected: 3 rows rejected" },
  { "degraded False is ignored", object { conditions = { ready, cond("Degraded", "False", "NoRejects", "") } },
    "Healthy", "Succeeded: Last run sent 12 rows" },
  { "ready while a run is in flight", object { conditions = { ready, cond("Reconciling", "True", "Running", "run started") } },
    "Healthy", "Succeeded: Last run sent 12 rows (a run is in flight)" },
  { "ready with no message uses the reason", object { conditions = { cond("Ready", "True", "Succeeded", "") } },
    "Healthy", "Succeeded" },
  { "ready with no reason uses the type", object { conditions = { cond("Ready", "True", nil, nil) } },
    "Healthy", "Ready" },
  { "first run in flight", object { conditions = { cond("Ready", "Unknown", "Reconciling", ""), cond("Reconciling", "True", "Running", "first run") } },
    "Progressing", "Running: first run" },
  { "last run failed", object { conditions = { cond("Ready", "False", "ConnectSource", "failed to connect to the warehouse"), not_reconciling } },
    "Degraded", "ConnectSource: failed to connect to the warehouse" },
  { "ready unknown", object { conditions = { cond("Ready", "Unknown", "Pending", "") } },
    "Progressing", "Waiting for the Ready condition" },
  { "no Ready condition", object { conditions = { not_reconciling } },
    "Progressing", "Waiting for the Ready condition" },
}

local destination_cases = {
  { "no status yet", object {}, "Progressing", "Waiting for the operator to report status" },
  { "status without conditions", object { status = {} }, "Progressing", "Waiting for the operator to report status" },
  { "spec changed, not yet observed", object { generation = 5, observed = 4, conditions = { ready } },
    "Progressing", "Waiting for the operator to observe generation 5" },
  { "stalled", object { conditions = { cond("Stalled", "True", "ReadSecret", "failed to read Secret hubspot-token: not found") } },
    "Degraded", "ReadSecret: failed to read Secret hubspot-token: not found" },
  { "connection check passed", object { conditions = { cond("Stalled", "False", "Ok", ""), cond("Ready", "True", "Connected", "connection check passed") } },
    "Healthy", "Connected: connection check passed" },
  { "check in flight", object { conditions = { cond("Reconciling", "True", "Checking", "checking the connection") } },
    "Progressing", "Checking: checking the connection" },
  { "check failed", object { conditions = { cond("Ready", "False", "CredentialsRejected", "credentials rejected by HubSpot"), not_reconciling } },
    "Degraded", "CredentialsRejected: credentials rejected by HubSpot" },
  { "ready unknown", object { conditions = { cond("Ready", "Unknown", "Pending", "") } },
    "Progressing", "Waiting for the Ready condition" },
}

local function run(script, o)
  local env = setmetatable({ obj = o }, { __index = _G })
  local chunk, err = loadfile(script, "t", env)
  if chunk == nil then
    error("cannot load " .. script .. ": " .. err)
  end
  return chunk()
end

local passed, failed = 0, 0
local function check(script, cases)
  for _, case in ipairs(cases) do
    local name, o, status, message = case[1], case[2], case[3], case[4]
    local ok, hs = pcall(run, script, o)
    if not ok then
      failed = failed + 1
      print(string.format("FAIL %s: %s: error: %s", script, name, tostring(hs)))
    elseif type(hs) ~= "table" or hs.status ~= status or hs.message ~= message then
      failed = failed + 1
      print(string.format("FAIL %s: %s: got %s %q, want %s %q", script, name,
        tostring(hs and hs.status), tostring(hs and hs.message), status, message))
    else
      passed = passed + 1
      print(string.format("ok   %s: %s -> %s", script, name, status))
    end
  end
end

check(dir .. "/health-reversesync.lua", reversesync_cases)
check(dir .. "/health-destination.lua", destination_cases)
print(string.format("lua: %d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
