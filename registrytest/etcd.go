package registrytest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/cloudwego/kitex/pkg/discovery"
	"github.com/cloudwego/kitex/pkg/registry"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const prefix = "/kitex/"

type instance struct {
	Network string            `json:"network"`
	Address string            `json:"address"`
	Weight  int               `json:"weight"`
	Tags    map[string]string `json:"tags"`
}

// Registry is a Kitex registry.Registry on etcd: each instance is a key
// /kitex/<service>/<address> under a lease that lives as long as the
// instance keeps it alive.
type Registry struct {
	cli    *clientv3.Client
	lease  clientv3.LeaseID
	cancel context.CancelFunc
}

// NewRegistry returns a registry on the etcd client.
func NewRegistry(cli *clientv3.Client) *Registry { return &Registry{cli: cli} }

// Register implements registry.Registry.
func (r *Registry) Register(info *registry.Info) error {
	if info == nil || info.Addr == nil {
		return fmt.Errorf("registrytest: no address to register")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	lease, err := r.cli.Grant(ctx, 10)
	if err != nil {
		return err
	}
	b, err := json.Marshal(instance{Network: info.Addr.Network(), Address: info.Addr.String(), Weight: info.Weight, Tags: info.Tags})
	if err != nil {
		return err
	}
	if _, err := r.cli.Put(ctx, key(info.ServiceName, info.Addr.String()), string(b), clientv3.WithLease(lease.ID)); err != nil {
		return err
	}
	kctx, kcancel := context.WithCancel(context.Background())
	ch, err := r.cli.KeepAlive(kctx, lease.ID)
	if err != nil {
		kcancel()
		return err
	}
	go func() {
		for range ch {
		}
	}()
	r.lease, r.cancel = lease.ID, kcancel
	return nil
}

// Deregister implements registry.Registry.
func (r *Registry) Deregister(info *registry.Info) error {
	if r.cancel != nil {
		r.cancel()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := r.cli.Delete(ctx, key(info.ServiceName, info.Addr.String()))
	return err
}

func key(service, addr string) string { return prefix + service + "/" + addr }

// Resolver is a Kitex discovery.Resolver on etcd.
type Resolver struct{ cli *clientv3.Client }

// NewResolver returns a resolver on the etcd client.
func NewResolver(cli *clientv3.Client) *Resolver { return &Resolver{cli: cli} }

// Target implements discovery.Resolver.
func (r *Resolver) Target(ctx context.Context, target rpcinfo.EndpointInfo) string {
	return target.ServiceName()
}

// Resolve implements discovery.Resolver.
func (r *Resolver) Resolve(ctx context.Context, desc string) (discovery.Result, error) {
	resp, err := r.cli.Get(ctx, prefix+desc+"/", clientv3.WithPrefix())
	if err != nil {
		return discovery.Result{}, err
	}
	var ins []discovery.Instance
	for _, kv := range resp.Kvs {
		var in instance
		if err := json.Unmarshal(kv.Value, &in); err != nil {
			continue
		}
		if _, _, err := net.SplitHostPort(in.Address); err != nil && !strings.HasPrefix(in.Network, "unix") {
			continue
		}
		w := in.Weight
		if w <= 0 {
			w = discovery.DefaultWeight
		}
		ins = append(ins, discovery.NewInstance(in.Network, in.Address, w, in.Tags))
	}
	return discovery.Result{Cacheable: true, CacheKey: desc, Instances: ins}, nil
}

// Diff implements discovery.Resolver.
func (r *Resolver) Diff(cacheKey string, prev, next discovery.Result) (discovery.Change, bool) {
	return discovery.DefaultDiff(cacheKey, prev, next)
}

// Name implements discovery.Resolver.
func (r *Resolver) Name() string { return "registrytest-etcd" }

var (
	_ registry.Registry  = (*Registry)(nil)
	_ discovery.Resolver = (*Resolver)(nil)
)
