-- wrk script of bench/api_load.py.
--
-- Each request carries the bench team's key (read from the environment so the secret is never
-- written to a file) and polls the next of the paths in ASFT_BENCH_PATHS (space-separated, one
-- per training job), so the load is spread over the jobs the bench's writer is training. With
-- ASFT_BENCH_CONDITIONAL=1 it sends, per job, the ETag of the last 200 it got for that job as
-- If-None-Match, as a polling client would. It counts answers by status and prints the counts
-- (`answers: 2xx=... 304=... other=...`), since wrk itself counts only statuses >= 400.
local key = os.getenv("ASFT_BENCH_KEY")
if key == nil or key == "" then
    error("ASFT_BENCH_KEY is not set")
end
local paths = {}
for path in string.gmatch(os.getenv("ASFT_BENCH_PATHS") or "", "%S+") do
    paths[#paths + 1] = path
end
if #paths == 0 then
    error("ASFT_BENCH_PATHS is not set")
end
local conditional = os.getenv("ASFT_BENCH_CONDITIONAL") == "1"

-- wrk does not say which request a response answers (a thread's connections interleave), so
-- each request names its job's index in X-Request-ID, which the API echoes in its answer.
local REQUEST_ID_PREFIX = "asft-bench-job-"

-- Globals, not locals: done() reads them from every thread with thread:get.
answers_2xx, answers_304, answers_other = 0, 0, 0

local etags = {} -- job index -> the ETag of the last 200 this thread got for it
local next_job = 0

local threads = {}

function setup(thread)
    thread:set("thread_index", #threads)
    threads[#threads + 1] = thread
end

function init(args)
    -- Threads start at different jobs, so they do not poll the same job in step.
    next_job = (thread_index or 0) % #paths
end

function request()
    next_job = next_job % #paths + 1
    local headers = {
        ["Authorization"] = "Bearer " .. key,
        ["X-Request-ID"] = REQUEST_ID_PREFIX .. next_job,
    }
    if conditional and etags[next_job] then
        headers["If-None-Match"] = etags[next_job]
    end
    return wrk.format("GET", paths[next_job], headers)
end

-- The value of header `name` (lower case), whatever case the server wrote it in.
local function header(headers, name)
    for field, value in pairs(headers) do
        if string.lower(field) == name then
            return value
        end
    end
    return nil
end

function response(status, headers, body)
    if status == 304 then
        answers_304 = answers_304 + 1
    elseif status >= 200 and status < 300 then
        answers_2xx = answers_2xx + 1
        if conditional then
            local job = tonumber(string.match(header(headers, "x-request-id") or "", "(%d+)$"))
            local tag = header(headers, "etag")
            if job and tag then
                etags[job] = tag
            end
        end
    else
        answers_other = answers_other + 1
    end
end

function done(summary, latency, requests)
    local ok, not_modified, other = 0, 0, 0
    for _, thread in ipairs(threads) do
        ok = ok + thread:get("answers_2xx")
        not_modified = not_modified + thread:get("answers_304")
        other = other + thread:get("answers_other")
    end
    io.write(string.format("answers: 2xx=%d 304=%d other=%d\n", ok, not_modified, other))
end
