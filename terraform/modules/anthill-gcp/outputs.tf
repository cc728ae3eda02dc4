output "client_endpoints" {
  description = "The nodes' gRPC addresses (internal), for clients in the VPC."
  value       = [for m in local.members : "${m.address}:7400"]
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders (from inside the VPC; with TLS, as the administrator, with the files of `tls.dir`)."
  value       = module.config.status_command
}

output "tls_server_name" {
  description = "The name clients check the nodes' certificates against (`--tls-server-name`, `ANTHILL_TLS_SERVER_NAME`); null without TLS."
  value       = var.tls.enabled ? local.tls_server_name : null
}

output "instance_names" {
  description = "The instances, in node order."
  value       = google_compute_instance.node[*].name
}
