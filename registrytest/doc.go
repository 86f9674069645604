// Package registrytest shows kshm with a real service registry: an embedded
// etcd, a small Kitex registry.Registry and discovery.Resolver on the etcd
// client, one kshm instance and one plain Kitex instance of a service. It is
// a module of its own so that etcd stays out of kshm's go.mod.
package registrytest
