output "client_endpoints" {
  description = "The nodes' gRPC addresses, for clients (`anthill … --server http://ADDRESS`)."
  value       = [for h in var.hosts : "${h.address}:7400"]
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders."
  value       = "anthill status --server http://${var.hosts[0].address}:7400"
}

output "founders" {
  description = "The hosts that founded the cluster (the first apply's), less those removed since."
  value       = local.founders
}
