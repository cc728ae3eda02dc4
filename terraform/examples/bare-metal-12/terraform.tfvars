# The twelve servers: the bare-metal lab's hosts (tests/e2e/lab/metal.sh up --hosts 12). List
# yours here: a name, the address Terraform, the clients and the other nodes reach it at, and a
# raft_id that is unique and never reused.
hosts = [
  { name = "host-01", address = "10.77.0.11", raft_id = 1, zone = "rack-1" },
  { name = "host-02", address = "10.77.0.12", raft_id = 2, zone = "rack-2" },
  { name = "host-03", address = "10.77.0.13", raft_id = 3, zone = "rack-3" },
  { name = "host-04", address = "10.77.0.14", raft_id = 4, zone = "rack-1" },
  { name = "host-05", address = "10.77.0.15", raft_id = 5, zone = "rack-2" },
  { name = "host-06", address = "10.77.0.16", raft_id = 6, zone = "rack-3" },
  { name = "host-07", address = "10.77.0.17", raft_id = 7, zone = "rack-1" },
  { name = "host-08", address = "10.77.0.18", raft_id = 8, zone = "rack-2" },
  { name = "host-09", address = "10.77.0.19", raft_id = 9, zone = "rack-3" },
  { name = "host-10", address = "10.77.0.20", raft_id = 10, zone = "rack-1" },
  { name = "host-11", address = "10.77.0.21", raft_id = 11, zone = "rack-2" },
  { name = "host-12", address = "10.77.0.22", raft_id = 12, zone = "rack-3" },
]
