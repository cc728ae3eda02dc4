output "client_endpoints" {
  description = "The nodes' gRPC addresses on the private network."
  value       = [for m in local.members : "${m.address}:7400"]
}

output "public_addresses" {
  description = "The servers' public IPv4 addresses, in node order."
  value       = hcloud_server.node[*].ipv4_address
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders (from the private network)."
  value       = "anthill status --server http://${local.members[0].address}:7400"
}
