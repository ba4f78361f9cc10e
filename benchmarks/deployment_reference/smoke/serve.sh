# TabbyAPI (FP16 cache) serving /tmp/m/tiny-4bpw, `deploy verify` against the entry point's reference (ref4.json.gz:
# the file smoke.sh wrote for tiny-4bpw). The recorded run used a fixed throwaway key; this copy draws one.
KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export PYTHONPATH=/tmp/site:$(pwd)/.dev/autokl PYTHONUNBUFFERED=1 NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
cd .tabby
printf '{"network":{"host":"127.0.0.1","port":5077},"model":{"model_dir":"/tmp/m","model_name":"tiny-4bpw","backend":"exllamav3","max_seq_len":4096,"cache_size":4096,"cache_mode":"FP16"},"sampling":{"override_preset":null}}' > config.yml
printf '{"api_key":"%s","admin_key":"%s"}' "$KEY" "admin$KEY" > api_tokens.yml
python3 main.py > /tmp/tabby.log 2>&1 &
cd ..
for i in $(seq 60); do curl -fs -H "X-API-Key: $KEY" http://127.0.0.1:5077/v1/model >/dev/null 2>&1 && break; sleep 1; done
echo "ready after ~$i s"
echo "$KEY" > /tmp/key
python3 -P -m toolkit.cli verify --url http://127.0.0.1:5077 --api-key-file /tmp/key --reference .dev/autokl/ref4.json.gz --expect-model tiny-4bpw --expect-cache-mode FP16 --json > $OUT/verify-fp16.json 2>/tmp/verify.err
echo "verify exit $? at ${SECONDS} s"; tail -3 /tmp/verify.err
python3 -c "import json;d=json.load(open('$OUT/verify-fp16.json'));print([(c['name'],c['passed']) for c in d['checks']]);k=d['kl'];print({x:k[x] for x in ('mean','ci95','median','max','positions','threshold')}, d['top1_agreement'])"
kill %1; tail -2 /tmp/tabby.log
