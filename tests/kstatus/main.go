// Reads a JSON array of Kubernetes objects on stdin and prints, one line
// each, the status kstatus (sigs.k8s.io/cli-utils, as Flux and kpt use it)
// computes for the object: Current, InProgress, Failed, ... and its message.
package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading objects:", err)
		os.Exit(2)
	}
	// Kubernetes' JSON decoding: whole numbers as int64, as the API machinery
	// hands objects to kstatus.
	var objects []interface{}
	if err := json.Unmarshal(data, &objects); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading objects:", err)
		os.Exit(2)
	}
	for _, o := range objects {
		object, ok := o.(map[string]interface{})
		if !ok {
			fmt.Fprintln(os.Stderr, "kstatus: not an object:", o)
			os.Exit(2)
		}
		result, err := status.Compute(&unstructured.Unstructured{Object: object})
		if err != nil {
			fmt.Printf("Error\t%v\n", err)
			continue
		}
		fmt.Printf("%s\t%s\n", result.Status, result.Message)
	}
}
