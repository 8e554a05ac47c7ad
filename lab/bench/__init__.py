"""`make bench` (`python -m lab.bench`): l3ptp against plain veth, OpenVPN and wireguard-go, on one box.

Root only. Every configuration runs on the lab's two-namespace topology
(host A and host B joined by a veth underlay in 198.18.0.0/16) and goes
through the same tests, client on A, server on B:

* ping, 20 packets 0.05 s apart (average RTT), and 200 packets 5 ms apart;
* iperf3 TCP, one stream: throughput, and the CPU time of the tunnel
  processes of both ends (utime + stime from /proc/<pid>/stat) per GB moved;
  during this run /proc/stat and iperf3's own CPU figures give the
  per-process CPU shares of the bottleneck section;
* iperf3 TCP, four streams (-P 4);
* iperf3 UDP at a fixed offered rate (default 300 Mbit/s): loss;
* iperf3 UDP at saturation (-b 0): received rate, packets/s and loss.

The configurations: `veth` (no tunnel, iperf3 to the underlay address),
`openvpn` (OpenVPN 2.6, point-to-point TLS mode, AES-256-GCM, UDP, a
throwaway CA made here), `wireguard-go` (keys and peer set with `wg`), and
l3ptp for each queue count x QUIC engine asked for. Figures are printed as
ratios against OpenVPN measured in the same run; nothing is asserted.

Every process started here is stopped by PID; each lab is closed (namespaces,
links and its work directory removed) after its configuration, also on a
failure or Ctrl-C, and what is left behind is checked.

Exit status: 0 all configurations measured, 1 one or more failed, 2 usage,
130 interrupted.

The package, split along its jobs: `runner` (the command, the tests of one
configuration, the l3ptp configurations), `baselines` (the packages, OpenVPN,
wireguard-go, veth), `cpu` (/proc accounting), `report` (iperf3/ping results,
the summary, tables); `common` holds what they share. `python -m
lab.bench.worker` is the worker micro-benchmark (one process, no root).
"""
