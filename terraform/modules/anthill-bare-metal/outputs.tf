output "client_endpoints" {
  description = "The nodes' gRPC addresses, for clients (`anthill … --server ADDRESS`, with the TLS flags of `status_command` when TLS is on)."
  value       = [for h in var.hosts : "${h.address}:7400"]
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders."
  value = (var.tls.enabled
    ? "anthill status --server https://${var.hosts[0].address}:7400 --tls-ca ${local.tls_dir}/ca.crt --tls-cert ${local.tls_dir}/admin.crt --tls-key ${local.tls_dir}/admin.key"
  : "anthill status --server http://${var.hosts[0].address}:7400")
}

output "founders" {
  description = "The hosts that founded the cluster (the first apply's), less those removed since."
  value       = local.founders
}
