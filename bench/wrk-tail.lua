-- wrk prints p50/75/90/99 with --latency; the tail target also wants
-- p99.9, so print it (microseconds) from wrk's own latency histogram.
done = function(summary, latency, requests)
  io.write(string.format("p99.9 latency us: %d\n", latency:percentile(99.9)))
end
