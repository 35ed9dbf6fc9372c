// Command controlplane is the lab's Kubernetes control plane: one binary holding etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler and kubectl, built from the
// upstream Go modules at one pinned release (go.mod). Like busybox it runs the
// component its first argument (or its own name, through a symlink) names; each takes
// the upstream component's own flags:
//
//	controlplane etcd --data-dir DIR --listen-client-urls URL
//	controlplane kube-apiserver --etcd-servers URL ...
//	controlplane kube-controller-manager --kubeconfig FILE ...
//	controlplane kube-scheduler --kubeconfig FILE ...
//	controlplane kubectl get nodes
//	controlplane version
//
// The components run as separate processes (nodeagent/lab/kube/controlplane.py starts
// them) rather than as goroutines of one: each registers global flags, feature gates,
// metrics and its component version in process-wide registries that would collide.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	_ "time/tzdata" // CronJob time zones, as the upstream kube-apiserver and controller-manager

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl's auth plugins, as upstream kubectl
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	"k8s.io/component-base/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

const usage = `usage: controlplane COMPONENT [FLAGS...]
components: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, version`

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name == "controlplane" {
		if len(args) == 0 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	// Each upstream command parses os.Args[1:] itself.
	os.Args = append([]string{name}, args...)
	switch name {
	case "etcd":
		os.Exit(runEtcd(args))
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubectl":
		runKubectl()
	case "version", "--version":
		fmt.Printf("controlplane %s (kubernetes %s, etcd %s)\n",
			version.Get().GitVersion, version.Get().GitVersion, etcdVersion())
	default:
		fmt.Fprintf(os.Stderr, "controlplane: unknown component %q\n%s\n", name, usage)
		os.Exit(2)
	}
}

// runKubectl is upstream cmd/kubectl/kubectl.go.
func runKubectl() {
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
}
