output "client_endpoints" {
  description = "The nodes' gRPC addresses (private), for clients in the VPC."
  value       = [for m in local.members : "${m.address}:7400"]
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders (from inside the VPC)."
  value       = "anthill status --server http://${local.members[0].address}:7400"
}

output "instance_ids" {
  description = "The instances, in node order."
  value       = aws_instance.node[*].id
}
