module github.com/shmkit/kshm/benchmark

go 1.26.0

replace github.com/shmkit/kshm => ../

require github.com/cloudwego/shmipc-go v0.2.0

require github.com/cloudwego/kitex v0.16.3 // indirect

require (
	github.com/bytedance/gopkg v0.1.4 // indirect
	github.com/go-ole/go-ole v1.2.6 // indirect
	github.com/power-devops/perfstat v0.0.0-20210106213030-5aafc221ea8c // indirect
	github.com/shirou/gopsutil/v3 v3.22.1 // indirect
	github.com/shmkit/kshm v0.0.0-00010101000000-000000000000
	github.com/yusufpapurcu/wmi v1.2.2 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
