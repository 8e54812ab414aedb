"""Each peers run of alternate-settings.sh on a line: saturated req/s and CPU a call, unloaded p50, half load p50/p99/CPU a call, the tail ratio."""
import json, glob, sys
for f in sorted(glob.glob(sys.argv[1])):
    d = json.load(open(f))
    v = d['peers v1 1w 64']['closed']; u = d['peers v1 1w 64 unloaded, open loop']
    r = d['peers_ratios']['1w 64']
    print(f.split('/')[-1][:-5].ljust(34), 'sat', v['requests_per_s'], 'cpu/call', v.get('server_cpu_ms_per_call'),
          '| unl p50', u['unloaded']['p50_ms'], '| half p50', u['open_at_half']['p50_ms'], 'p99', u['open_at_half']['p99_ms'],
          'cpu/call', u['open_at_half']['server_cpu_ms_per_call'], '| tail', r['v1_p99_at_half_over_unloaded_p50'], 'ceil', r['v1_over_ceiling'])
