# `terraform test` (offline: the module has no provider): the configurations it renders.

variables {
  members = [
    { name = "a-1", address = "10.0.1.10", raft_id = 1 },
    { name = "a-2", address = "10.0.2.10", raft_id = 2 },
    { name = "a-3", address = "10.0.3.10", raft_id = 3 },
    { name = "a-4", address = "10.0.1.11", raft_id = 4 },
  ]
  founders = ["a-1", "a-2", "a-3"]
}

run "every_node_lists_every_member_and_only_later_ones_join" {
  command = plan

  assert {
    condition     = yamldecode(output.yaml["a-2"]).cluster.members[3].address == "10.0.1.11:7400"
    error_message = "a-2 does not list a-4 at its address"
  }
  assert {
    condition     = yamldecode(output.yaml["a-2"]).node_id == "a-2" && yamldecode(output.yaml["a-2"]).cluster.join == false
    error_message = "a founder joins, or names itself wrong"
  }
  assert {
    condition     = yamldecode(output.yaml["a-4"]).cluster.join == true
    error_message = "a-4, added after the founders, does not join"
  }
  assert {
    condition     = output.status_command == "anthill status --server http://10.0.1.10:7400" && !can(yamldecode(output.yaml["a-1"]).tls)
    error_message = "without tls.dir, TLS is configured or the status command uses it"
  }
  assert {
    condition     = yamldecode(output.yaml["a-1"]).cluster.coordination.kind == "embedded" && yamldecode(output.yaml["a-1"]).cluster.session_ttl_ms == 1000
    error_message = "the default is the embedded store with 1 s leases"
  }
}

run "consul_gets_its_token_file_and_a_ten_second_session" {
  command = plan
  variables {
    coordination = { kind = "consul" }
    consul_token = "0b7f7e4c-0000-4000-8000-000000000002"
  }

  assert {
    condition     = yamldecode(output.yaml["a-1"]).cluster.coordination.token_file == "/etc/anthill/consul-token" && yamldecode(output.yaml["a-1"]).cluster.session_ttl_ms == 10000
    error_message = "consul: no token file or a session TTL under Consul's minimum"
  }
}

run "a_reused_raft_id_is_refused" {
  command = plan
  variables {
    members = [
      { name = "a-1", address = "10.0.1.10", raft_id = 1 },
      { name = "a-2", address = "10.0.2.10", raft_id = 1 },
    ]
  }
  expect_failures = [var.members]
}

run "the_cloud_init_writes_the_configuration_and_starts_the_node" {
  command = plan
  variables {
    coordination = { kind = "consul" }
    consul_token = "0b7f7e4c-0000-4000-8000-000000000001"
  }

  assert {
    condition     = strcontains(output.cloud_init["a-3"], base64encode(output.yaml["a-3"])) && strcontains(output.cloud_init["a-3"], "[systemctl, start, anthill.service]")
    error_message = "a-3's user data does not write its configuration or start the node"
  }
  assert {
    condition     = strcontains(output.cloud_init["a-3"], "/etc/anthill/consul-token")
    error_message = "the Consul token is not written"
  }
}

run "no_token_no_token_file_and_overrides_merge_into_the_cluster_settings" {
  command = plan
  variables {
    coordination     = { kind = "consul", consul_address = "http://consul.internal:8500" }
    config_overrides = { cluster = { session_ttl_ms = 15000 }, telemetry = { log_level = "debug" } }
  }

  assert {
    condition     = !can(yamldecode(output.yaml["a-1"]).cluster.coordination.token_file) && yamldecode(output.yaml["a-1"]).cluster.coordination.address == "http://consul.internal:8500"
    error_message = "a token file is named with no token given"
  }
  assert {
    condition     = yamldecode(output.yaml["a-1"]).cluster.session_ttl_ms == 15000 && length(yamldecode(output.yaml["a-1"]).cluster.members) == 4 && yamldecode(output.yaml["a-1"]).telemetry.log_level == "debug"
    error_message = "an override of one cluster setting lost the others (members) or was not applied"
  }
}

run "tls_files_are_written_and_named_in_the_configuration" {
  command = plan
  variables {
    tls = { dir = "tests/tls", server_name = "shop" }
  }

  assert {
    condition     = yamldecode(output.yaml["a-2"]).tls.cert_file == "/etc/anthill/tls/node.crt" && yamldecode(output.yaml["a-2"]).tls.key_file == "/etc/anthill/tls/node.key" && yamldecode(output.yaml["a-2"]).tls.ca_file == "/etc/anthill/tls/ca.crt"
    error_message = "the configuration does not name the TLS files"
  }
  assert {
    condition     = strcontains(output.cloud_init["a-2"], base64encode(file("tests/tls/a-2.key"))) && strcontains(output.cloud_init["a-2"], base64encode(file("tests/tls/ca.crt"))) && !strcontains(output.cloud_init["a-2"], base64encode(file("tests/tls/a-3.key")))
    error_message = "a-2's user data does not write its own key and the CA, or writes another member's key"
  }
  assert {
    condition     = strcontains(output.cloud_init["a-2"], "path: /etc/anthill/tls/node.key")
    error_message = "the key is not written where the configuration names it"
  }
  assert {
    condition     = output.status_command == "anthill --tls-ca tests/tls/ca.crt --tls-cert tests/tls/admin.crt --tls-key tests/tls/admin.key --tls-server-name shop status --server https://10.0.1.10:7400"
    error_message = "the status command does not use TLS as the administrator: ${output.status_command}"
  }
}

run "a_missing_tls_file_is_named" {
  command = plan
  variables {
    tls = { dir = "tests/tls" }
    members = [
      { name = "a-1", address = "10.0.1.10", raft_id = 1 },
      { name = "a-9", address = "10.0.2.10", raft_id = 2 },
    ]
  }
  expect_failures = [output.cloud_init, output.tls_files]
}

run "a_member_name_as_the_client_name_is_refused" {
  command = plan
  variables {
    tls = { dir = "tests/tls", server_name = "a-2" }
  }
  expect_failures = [output.cloud_init]
}
