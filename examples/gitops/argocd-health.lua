-- Argo CD health check for licensor.dev/DedicatedLicense, from its kstatus
-- conditions. Install it under resource.customizations.health.licensor.dev_DedicatedLicense
-- in argocd-cm (see charts/licensor/README.md).
local hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
   and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not seen the latest spec yet"
  return hs
end
local ready, stalled, reconciling
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then ready = c end
  if c.type == "Stalled" then stalled = c end
  if c.type == "Reconciling" then reconciling = c end
end
if stalled ~= nil and stalled.status == "True" then
  return {status = "Degraded", message = stalled.reason .. ": " .. (stalled.message or "")}
end
if ready ~= nil and ready.status == "True" then
  return {status = "Healthy", message = ready.message or ""}
end
if reconciling ~= nil and reconciling.status == "True" then
  return {status = "Progressing", message = reconciling.reason .. ": " .. (reconciling.message or "")}
end
if ready ~= nil and ready.reason == "Paused" then
  return {status = "Suspended", message = ready.message or ""}
end
if ready ~= nil then
  return {status = "Degraded", message = ready.reason .. ": " .. (ready.message or "")}
end
return hs
