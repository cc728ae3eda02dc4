output "client_endpoints" {
  description = "The nodes' gRPC addresses on the private network."
  value       = [for m in local.members : "${m.address}:7400"]
}

output "public_addresses" {
  description = "The servers' public IPv4 addresses, in node order."
  value       = hcloud_server.node[*].ipv4_address
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders (from the private network; with TLS, as the administrator, with the files of `tls.dir`)."
  value       = module.config.status_command
}

output "tls_server_name" {
  description = "The name clients check the nodes' certificates against (`--tls-server-name`, `ANTHILL_TLS_SERVER_NAME`); null without TLS."
  value       = var.tls.enabled ? local.tls_server_name : null
}
