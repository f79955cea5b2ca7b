-- wrk script of bench/api_load.py: every request carries the bench team's key, read from
-- the environment so the secret is never written to a file.
local key = os.getenv("ASFT_BENCH_KEY")
if key == nil or key == "" then
    error("ASFT_BENCH_KEY is not set")
end
wrk.headers["Authorization"] = "Bearer " .. key
